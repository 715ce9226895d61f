"""stage=dpo: direct preference optimisation, as a recipe over the SFT recipe's parts (data, model, distributed,
checkpoints, export). What differs is small and lives here: the data are pairs, a step's objective is
preference.PreferenceLoss against a reference model, and evaluation scores held-out pairs (loss, accuracy,
margins, log-probs).

The reference is the run's starting point. Under LoRA it is the model itself with its adapters off (and its
learnable λ at their start), so there is no second copy in memory; under full fine-tuning it is a frozen copy
taken before the first step, in eval mode, sharded like the policy under FSDP (and not wrapped under DDP: it
has no gradients to reduce)."""

from __future__ import annotations

import copy

from hsa_train.data.dataset import pair_eval_batches
from hsa_train.training import distributed as D
from hsa_train.training.preference import (
    PreferenceLoss,
    adapters_off,
    frozen_copy,
    preference_eval_sums,
    summarize_preference,
)
from hsa_train.training.recipe import Recipe
from hsa_train.training.report import preference_eval_line, preference_eval_log, preference_eval_summary
from hsa_train.training.step import make_forward


class PreferenceRecipe(Recipe):
    pairs = True

    def _before_wrap(self, model) -> None:
        self.reference_model = None
        if self.lora:
            return
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if self.info.mode == "fsdp":  # sharded as the policy is: each rank keeps its share of the copy
            mixed = self.autocast_dtype is not None and self.device.type == "cuda"
            reference = D.wrap(reference, self.info, self.device, mixed_bf16=mixed)
        self.reference_model = reference

    def _objective(self) -> PreferenceLoss:
        st, use_hsa = self.run.stage, self.run.hsa.enabled
        if self.reference_model is None:  # LoRA: the policy's own module (unwrapped: no DDP hooks) without adapters
            forward = make_forward(D.unwrap(self.model), self.device, self.autocast_dtype, use_hsa)
            reference = adapters_off(self.model, forward)
        else:
            reference = frozen_copy(make_forward(self.reference_model, self.device, self.autocast_dtype, use_hsa))
        return PreferenceLoss(reference, st.beta, st.label_smoothing, st.loss)

    def evaluate_samples(self, samples, generate: bool = False) -> dict | None:
        """The objective over held-out pairs, split over the ranks with the same number of forwards on each and
        summed over all of them (eval.generate is refused for stage=dpo at validation)."""
        if not samples:
            return None
        self.model.eval()
        batches = pair_eval_batches(samples, self.cfg.eval_batch_size, self.collator, self.info.rank, self.info.world)
        sums = preference_eval_sums(self.objective, self.forward, batches)
        totals = D.all_reduce_sum(sums, self.device, self.info)
        self.model.train()
        return summarize_preference(totals)

    def eval_report(self, name: str, prefix: str, result: dict) -> tuple[str, dict[str, float]]:
        return preference_eval_line(name, result), preference_eval_log(prefix, result)

    def eval_summary(self, result: dict | None) -> dict:
        return preference_eval_summary(result)
