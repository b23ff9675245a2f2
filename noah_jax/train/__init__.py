"""Training: the trainer (`trainer.train_and_evaluate`) and what it runs on.

  trainer       the loop: checks, restore-or-init, the update step, evaluation, saves
  evaluators    named evaluations chosen by `config.evals`
  losses, metrics, optim, durations, sharding    the pieces the step is made of
  checkpoint    Orbax train-state checkpoints and their metadata
  workdir_lock, preemption, host_memory, run_log, jsonl_writer    run operations

Modules import nothing from the commands (noah_jax.predict, ...), only from
noah_jax.models, noah_jax.data and noah_jax.errors.
"""
