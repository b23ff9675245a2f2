"""Trains and evaluates a NOAH model: `python main.py --config=configs/vit_noah.py --workdir=DIR`.

Config arguments follow a colon (`--config=configs/vit_noah.py:variant=tiny_050,head=linear`)
and single fields can be overridden (`--config.batch_size=128`). A run restarted with
the same --workdir resumes from its newest checkpoint.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from noah_jax import cli

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the saved config.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs without auto-detection: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if "://" in FLAGS.workdir:
        # The run log, config.json and the checkpoint bookkeeping use local file APIs.
        sys.exit(f"error: --workdir={FLAGS.workdir}: a workdir must be a local path, or a "
                 "bucket mounted as one (e.g. with Cloud Storage FUSE) at the same path on "
                 "every host; dataset.data_dir may be a gs:// bucket")
    import jax
    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    from noah_jax import errors
    from noah_jax.train import run_log, trainer
    run_log.setup_console()  # here, not before app.run: it imports JAX (--help stays quick)
    try:
        results = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except errors.Stopped as e:  # a signal or preemption: a checkpoint was saved
        run_log.append(FLAGS.workdir, str(e), level="WARNING")
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except errors.UserError as e:
        # Mistakes in the config, the data or the workdir, and failed checkpoint writes:
        # the message says what to do, and a traceback through TFDS or Orbax would only
        # bury it. Printed once, on one line; the trainer keeps it in the run's log.txt
        # when the run got as far as writing (a refused run leaves the workdir as it
        # was). Any other exception is a bug and keeps its traceback.
        sys.exit(f"error: {cli.one_line(str(e))}")
    except KeyboardInterrupt:  # Ctrl-C before training began (in training, it saves)
        sys.exit("interrupted before training started; nothing was saved")
    if not FLAGS.config.eval_only:  # the figure of the trained model, if the config asks
        from noah_jax import visualize
        visualize.run_attention_figure(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        if "eval/mAP" in results:
            print(f"test mAP: {100 * results['eval/mAP']:.2f}%, CF1 "
                  f"{100 * results['eval/CF1']:.2f}%, OF1 {100 * results['eval/OF1']:.2f}% "
                  f"({int(results['eval/count'])} images)", flush=True)
        if "eval/top1" in results:
            print(f"test top-1: {100 * results['eval/top1']:.2f}% "
                  f"({int(results['eval/count'])} images)", flush=True)


if __name__ == "__main__":
    from noah_jax.train import host_memory
    host_memory.use_huge_pages()  # may start this command again, before anything is allocated
    app.run(main, flags_parser=cli.parse_flags)
