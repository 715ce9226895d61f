"""The training recipe (loop.py) and the pieces it uses: optimizer/schedule, loss, evaluation, console/wandb."""
