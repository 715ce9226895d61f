"""How a run reports its numbers: the eval line on the console, the scalars for the tracker, the metrics.json
fields."""

from __future__ import annotations


def loss_summary(losses: list[float], window: int) -> dict[str, float]:
    tail = losses[-window:]
    return {
        "train_loss_first": losses[0],
        "train_loss_final": losses[-1],
        "train_loss_final_avg": sum(tail) / len(tail),
    }


def eval_summary(result: dict | None) -> dict:
    """The held-out split's metrics under their metrics.json names (eval_loss, eval_exact_match, ...)."""
    keys = ("loss", "loss_per_type", "tokens_per_type", "exact_match", "answer_token_accuracy", "answers_by")
    return {f"eval_{key}": (result.get(key) if result else None) for key in keys}


def eval_line(name: str, result: dict) -> str:
    per_type = ", ".join(
        f"{k} {v:.4f} ({result['tokens_per_type'][k]} tok)" for k, v in result["loss_per_type"].items() if v is not None
    )
    line = f"{name}: loss {result['loss']:.4f} over {result['tokens']} tokens | per type: {per_type}"
    if result["exact_match"] is not None:
        line += (
            f" | final answer{' (generated)' if result.get('answers_by') == 'generation' else ''}: "
            f"exact match {result['exact_match']:.3f} of {result['answers']}, "
            f"token accuracy {result['answer_token_accuracy']:.3f}"
        )
    return line


def eval_log(prefix: str, result: dict) -> dict[str, float]:
    """The scalars of one evaluation for the tracker, under `prefix` (eval/, eval/len4x/, ...)."""
    logged = {f"{prefix}loss": result["loss"]}
    logged.update({f"{prefix}loss_{k}": v for k, v in result["loss_per_type"].items() if v is not None})
    for key in ("exact_match", "answer_token_accuracy"):
        if result[key] is not None:
            logged[f"{prefix}{key}"] = result[key]
    return logged


def preference_eval_summary(result: dict | None) -> dict:
    """A preference run's held-out metrics (preference.summarize_preference) under their metrics.json names:
    eval_loss, eval_pairs, eval_rewards.{chosen,rejected,accuracy,margin}, eval_logps.{chosen,rejected}."""
    return {f"eval_{key}": (result.get(key) if result else None) for key in ("loss", "pairs", "rewards", "logps")}


def preference_eval_line(name: str, result: dict) -> str:
    rewards, logps = result["rewards"], result["logps"]
    if not result["pairs"]:
        return f"{name}: no pairs"
    return (
        f"{name}: loss {result['loss']:.4f} over {result['pairs']} pairs | accuracy {rewards['accuracy']:.3f}, "
        f"margin {rewards['margin']:.4f} | rewards chosen {rewards['chosen']:.4f}, rejected {rewards['rejected']:.4f}"
        f" | logps chosen {logps['chosen']:.2f}, rejected {logps['rejected']:.2f}"
    )


def preference_eval_log(prefix: str, result: dict) -> dict[str, float]:
    logged = {f"{prefix}loss": result["loss"]}
    for group in ("rewards", "logps"):
        logged.update({f"{prefix}{group}/{k}": v for k, v in result[group].items() if v is not None})
    return logged
