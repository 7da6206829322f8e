"""``python -m sim_merlin.fit``: train, evaluate, benchmark, export and score SIM, DIN and DIEN.

Reads the output of ``workflows/preprocess.py`` (``DATASET_DIR/train`` and ``DATASET_DIR/test``:
parquet + Merlin schema) with the Merlin dataloader. Every option of the reference's ``main.py``
exists with the same default; ``--help`` lists them all, and the README's "Training" section
explains the log format and the multi-process command.

Example (on the built-in data, after ``scripts/quickstart.sh``)::

    python -m sim_merlin.fit --dataset_dir data/processed --global_batch_size 4096 --epochs 1
    horovodrun -np 2 python -m sim_merlin.fit --dataset_dir data/processed   # 2 workers
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shutil
import sys
import time

import sim_merlin.tf_compat  # noqa: F401  (before TensorFlow)
from sim_merlin.files import remove_abandoned, replace_directory, write_json_atomic

MODES = ("train", "evaluate", "inference", "export", "predict")
MODEL_TYPES = ("sim", "din", "dien")

# Options of the reference that the Merlin design makes unnecessary: accepted so existing launch
# scripts keep working, and ignored with this explanation.
REFERENCE_ONLY_OPTIONS = {
    "feature_spec": "the Merlin schema (schema.pbtxt) in each split replaces feature_spec.yaml",
    "prebatch_train_size": "parquet is read directly in batches; there is no prebatched TFRecord",
    "prebatch_test_size": "parquet is read directly in batches; there is no prebatched TFRecord",
    "disable_cache": "the Merlin dataloader streams parquet each epoch; there is no tf.data cache",
    "repeat_count": "epochs are counted by --epochs; batches are not repeated",
    "num_parallel_calls": "the Merlin dataloader reads in its own background thread",
    "prefetch_train_size": "the Merlin dataloader prefetches one chunk in the background",
    "prefetch_test_size": "the Merlin dataloader prefetches one chunk in the background",
    "affinity": "CPU affinity is left to the launcher (horovodrun --binding-args / numactl)",
}


def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in str(text).split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not dims or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive layer sizes, got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim_merlin.fit",
        description="Train, evaluate, benchmark, export or score SIM / DIN / DIEN on data "
                    "written by workflows/preprocess.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Reference options with no effect here (accepted for compatibility): "
               + "; ".join(f"--{k}: {v}" for k, v in REFERENCE_ONLY_OPTIONS.items()),
    )
    add = parser.add_argument
    add("--mode", choices=MODES, default="train",
        help="train (and evaluate each epoch); evaluate a checkpoint on the test split; "
             "inference throughput over the train split; export a SavedModel; predict a "
             "parquet file")
    add("--model_type", choices=MODEL_TYPES, default="sim")
    add("--dataset_dir", default=None,
        help="output of workflows/preprocess.py (train/ and test/ with parquet + schema.pbtxt)")
    add("--results_dir", default="/tmp/sim", help="where the log file goes")
    add("--log_filename", default="log.json", help="dllogger JSON-lines log in results_dir")
    data = parser.add_argument_group("data")
    data.add_argument("--global_batch_size", type=int, default=131072,
                      help="samples per step over all workers (each gets global / workers)")
    data.add_argument("--eval_batch_size", type=int, default=None,
                      help="per-worker batch for evaluation and inference (default: the "
                           "per-worker training batch)")
    data.add_argument("--drop_remainder", action="store_true",
                      help="drop each epoch's last incomplete training batch")
    data.add_argument("--long_seq_length", type=int, default=90,
                      help="oldest history slots that form the long sequence; the newest "
                           "(history length - this) form the short sequence")
    data.add_argument("--sharding", choices=("rows", "partitions"), default="rows",
                      help="how workers split the data: every n-th row (balanced) or the "
                           "Merlin dataloader's whole partitions (uneven)")
    model = parser.add_argument_group("model")
    model.add_argument("--embedding_dim", type=int, default=16)
    model.add_argument("--stage_one_mlp_dims", type=_dims, default="200",
                       help="SIM's GSU tower")
    model.add_argument("--stage_two_mlp_dims", type=_dims, default="200,80",
                       help="SIM's ESU tower; DIN's and DIEN's tower")
    model.add_argument("--aux_mlp_dims", type=_dims, default="100,50",
                       help="auxiliary-loss tower (SIM, DIEN)")
    model.add_argument("--dropout_rate", type=float, default=-1,
                       help="dropout before each tower's output; <= 0 disables it")
    model.add_argument("--search_mode", choices=("soft", "hard"), default="soft",
                       help="SIM's GSU: inner-product top-k, or same category as the target")
    model.add_argument("--top_k", type=int, default=50, help="behaviours the GSU selects")
    model.add_argument("--esu_attention", choices=("multihead", "dot"), default="multihead",
                       help="SIM's ESU: the paper's multi-head attention or the reference's dot")
    model.add_argument("--esu_heads", type=int, default=4)
    model.add_argument("--gru_units", type=int, default=None, help="default 6 x embedding_dim")
    model.add_argument("--reference_compatible", action="store_true",
                       help="reproduce the reference model exactly (see the README)")
    train = parser.add_argument_group("training")
    train.add_argument("--optimizer", choices=("adam", "lazy_adam", "sgd"), default="adam")
    train.add_argument("--lr", type=float, default=0.01)
    train.add_argument("--weight_decay", type=float, default=0.0,
                       help="decoupled, per step, not scaled by lr (as tfa's AdamW/SGDW)")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--seed", type=int, default=-1, help="-1: a random seed (logged)")
    train.add_argument("--deterministic", action="store_true",
                       help="deterministic ops (TensorFlow's op determinism) and one intra-op "
                            "thread: with the same --seed, identical losses and weights run "
                            "after run (on CPU; slower, see the README)")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision: float16 with loss scaling on GPUs, bfloat16 on "
                            "CPUs (see --amp_dtype)")
    train.add_argument("--amp_dtype", choices=("auto", "float16", "bfloat16"), default="auto")
    train.add_argument("--xla", action="store_true",
                       help="XLA: auto-clustering of the training step (as the reference), "
                            "the prediction step compiled whole")
    train.add_argument("--sparse_as_dense", action="store_true",
                       help="turn embedding gradients into dense tensors (the reference "
                            "always does; slower, same result)")
    train.add_argument("--no_train_eval", action="store_true",
                       help="skip evaluating the whole train split after each epoch")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true",
                       help="measure training throughput only (no evaluation, no checkpoints)")
    bench.add_argument("--benchmark_warmup_steps", type=int, default=20)
    bench.add_argument("--benchmark_steps", type=int, default=0,
                       help="steps measured after warm-up; <= 0: all remaining steps")
    ckpt = parser.add_argument_group("checkpoints and export")
    ckpt.add_argument("--save_checkpoint_path", default="",
                      help="directory for a checkpoint after each epoch")
    ckpt.add_argument("--load_checkpoint_path", default="",
                      help="checkpoint directory (latest) or prefix to start from; resumes at "
                           "the epoch after the saved one")
    ckpt.add_argument("--keep_checkpoints", type=int, default=1, help="keep the last N")
    ckpt.add_argument("--overwrite", action="store_true",
                      help="replace an existing --export_dir or --predict_output, and start "
                           "over in a --save_checkpoint_path that holds another run's "
                           "checkpoints (otherwise refused)")
    ckpt.add_argument("--export_dir", default="",
                      help="write a SavedModel here (after training, or in --mode export)")
    ckpt.add_argument("--predict_input", default="",
                      help="--mode predict: a directory of parquet files with schema.pbtxt "
                           "(as workflows/preprocess.py writes) to score")
    ckpt.add_argument("--predict_output", default="",
                      help="--mode predict: parquet file to write (default: "
                           "results_dir/predictions.parquet)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--intra_op_parallelism", type=int, default=0)
    runtime.add_argument("--inter_op_parallelism", type=int, default=0)
    runtime.add_argument("--inference_shards", type=int, default=1,
                         help="score each batch (inference, evaluation, prediction) as N blocks "
                              "of rows run side by side: the same scores; with "
                              "--intra_op_parallelism 1, N = the number of cores is fastest")
    runtime.add_argument("--horovod", choices=("auto", "on", "off"), default="auto",
                         help="auto: use Horovod when launched by horovodrun")
    runtime.add_argument("--print_every", type=int, default=20,
                         help="print every n-th step's losses to stdout (the log file gets "
                              "every step)")
    runtime.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                         help="a progress bar (auto: when stderr is a terminal)")
    compat = parser.add_argument_group("reference options with no effect (see epilog)")
    for name in REFERENCE_ONLY_OPTIONS:
        if name == "disable_cache":
            compat.add_argument("--disable_cache", action="store_true", help=argparse.SUPPRESS)
        else:
            compat.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return parser


class FitError(RuntimeError):
    """A problem with the command's options or inputs; the message says what to change."""


def main(argv=None) -> int:
    from sim_merlin.environment import quiet_merlin_notices

    quiet_merlin_notices()
    args = build_parser().parse_args(argv)
    from sim_merlin.training.data import DatasetError

    try:
        return Run(args).run()
    except (FitError, DatasetError) as error:  # DatasetError: bad values met while reading
        print(f"sim_merlin.fit: error: {error}", file=sys.stderr)
        return 2


class Run:
    """One invocation of the command (see :func:`main`)."""

    def __init__(self, args):
        self.args = args
        _check_options(args)
        _check_outputs(args)
        from sim_merlin.training.distributed import Distributed

        self.dist = Distributed.create(use_horovod={"auto": "auto", "on": True,
                                                    "off": False}[args.horovod])
        self.device = self._configure_tensorflow()
        if args.global_batch_size % self.dist.size:
            raise FitError(f"--global_batch_size {args.global_batch_size} is not divisible by "
                           f"the {self.dist.size} workers")
        self.local_batch = args.global_batch_size // self.dist.size
        self.eval_batch = args.eval_batch_size or self.local_batch
        self.seed = self._agree_seed()
        self.log, self.out = self._loggers()
        for name, why in REFERENCE_ONLY_OPTIONS.items():
            if getattr(args, name) not in (None, False):
                self.say(f"note: --{name} has no effect here: {why}")

    # -- setup -------------------------------------------------------------------------------
    def _configure_tensorflow(self) -> str:
        """Thread pools; one GPU per worker (its local rank) with memory growth. The device."""
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[self.dist.local_rank % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        if self.args.deterministic:
            if self.args.intra_op_parallelism not in (0, 1):
                self.say(f"note: --deterministic runs one intra-op thread; "
                         f"--intra_op_parallelism {self.args.intra_op_parallelism} is ignored")
            # Bit-identical results need a fixed reduction order: op determinism, and one
            # intra-op thread (oneDNN's and Eigen's multi-threaded reductions split the work
            # by thread count and timing).
            tf.config.experimental.enable_op_determinism()
            tf.config.threading.set_intra_op_parallelism_threads(1)
        elif self.args.intra_op_parallelism:
            tf.config.threading.set_intra_op_parallelism_threads(self.args.intra_op_parallelism)
        if self.args.inter_op_parallelism:
            tf.config.threading.set_inter_op_parallelism_threads(self.args.inter_op_parallelism)
        return "gpu" if gpus else "cpu"

    def _agree_seed(self) -> int:
        seed = self.args.seed if self.args.seed >= 0 else random.SystemRandom().randrange(2**31)
        seed = int(self.dist.broadcast_object(seed))
        import numpy as np
        import tensorflow as tf

        random.seed(seed)
        np.random.seed(seed)
        tf.random.set_seed(seed)
        return seed

    def _loggers(self):
        from sim_merlin.training.logger import DLLogger, reference_metadata

        chief = self.dist.is_chief
        path = os.path.join(self.args.results_dir, self.args.log_filename)
        log = DLLogger(path, stdout=False, enabled=chief,
                       append=bool(self.args.load_checkpoint_path))
        reference_metadata(log)
        return log, DLLogger(None, stdout=True, enabled=chief)

    def say(self, message: str):
        if self.dist.is_chief:
            print(message, flush=True)

    def split(self, name: str):
        if not self.args.dataset_dir:
            raise FitError(f"--dataset_dir is required for --mode {self.args.mode}")
        return _open_split(os.path.join(self.args.dataset_dir, name))

    def model_options(self, schema) -> dict:
        from sim_merlin.blocks.inputs import SequenceLayout

        a = self.args
        history = SequenceLayout(schema).history_length
        if not 0 < a.long_seq_length < history:
            raise FitError(f"--long_seq_length must be in 1 .. {history - 1} for histories of "
                           f"length {history} (schema.pbtxt), got {a.long_seq_length}")
        options = dict(embedding_dim=a.embedding_dim, short_length=history - a.long_seq_length,
                       dropout_rate=max(a.dropout_rate, 0.0),
                       reference_compatible=a.reference_compatible)
        if a.model_type == "sim":
            options.update(top_k=a.top_k, search_mode=a.search_mode,
                           esu_attention=a.esu_attention, esu_heads=a.esu_heads,
                           stage_one_mlp_dims=a.stage_one_mlp_dims,
                           stage_two_mlp_dims=a.stage_two_mlp_dims,
                           aux_mlp_dims=a.aux_mlp_dims, gru_units=a.gru_units)
        elif a.model_type == "dien":
            options.update(mlp_dims=a.stage_two_mlp_dims, aux_mlp_dims=a.aux_mlp_dims,
                           gru_units=a.gru_units)
        else:
            options.update(mlp_dims=a.stage_two_mlp_dims)
        return options

    def build(self, schema, sample_features):
        """Model, optimizer and trainer, all variables created; checkpoint restored if asked."""
        import tensorflow as tf

        from sim_merlin.models.dien import DIENModel
        from sim_merlin.models.din import DINModel
        from sim_merlin.models.sim import SIMModel
        from sim_merlin.training.optimizers import build_optimizer
        from sim_merlin.training.trainer import Trainer, precision_policy

        a = self.args
        policy = precision_policy(a.amp, self.device, a.amp_dtype)
        tf.keras.mixed_precision.set_global_policy(policy)
        self.model_config = {"model_type": a.model_type, **self.model_options(schema)}
        factory = {"sim": SIMModel, "din": DINModel, "dien": DIENModel}[a.model_type]
        model = factory(schema, **self.model_options(schema))
        optimizer = build_optimizer(a.optimizer, a.lr, a.weight_decay)
        trainer = Trainer(model, optimizer, self.dist, xla=a.xla,
                          sparse_as_dense=a.sparse_as_dense, inference_shards=a.inference_shards)
        trainer.build(sample_features)
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=trainer.optimizer,
            epoch=tf.Variable(-1, dtype=tf.int64), step=tf.Variable(0, dtype=tf.int64),
        )
        if a.load_checkpoint_path:
            self._restore(a.load_checkpoint_path)
        trainer.broadcast()
        self.say(f"{a.model_type.upper()}: {_count(model.trainable_variables)} trainable "
                 f"parameters, precision {policy}, {self.dist.size} worker(s), seed {self.seed}")
        return trainer

    def _restore(self, path: str):
        import tensorflow as tf

        prefix = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
        if not prefix or not tf.io.gfile.exists(prefix + ".index"):
            raise FitError(f"--load_checkpoint_path {path}: no checkpoint found")
        saved = _read_json(os.path.join(os.path.dirname(prefix), "model_config.json"))
        wanted = _jsonable(self.model_config)
        if saved is not None and saved != wanted:
            changed = [f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here"
                       for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
            raise FitError(f"--load_checkpoint_path {path}: saved with a different model "
                           f"configuration ({'; '.join(changed)})")
        try:
            self.checkpoint.restore(prefix).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise FitError(f"--load_checkpoint_path {prefix}: does not match this model "
                           f"({str(error).splitlines()[0][:300]})") from error
        self.say(f"restored {prefix} (epoch {int(self.checkpoint.epoch.numpy())}, "
                 f"step {int(self.checkpoint.step.numpy())})")
        # The optimizer's learning rate is a variable, restored with the rest: --lr wins.
        optimizer = getattr(self.checkpoint.optimizer, "inner_optimizer",
                            self.checkpoint.optimizer)
        rate = getattr(optimizer, "learning_rate", None)
        if isinstance(rate, tf.Variable) and float(rate.numpy()) != float(
                tf.constant(self.args.lr, rate.dtype).numpy()):
            self.say(f"--lr {self.args.lr:g} replaces the checkpoint's learning rate "
                     f"{float(rate.numpy()):g}")
            rate.assign(self.args.lr)

    # -- modes -------------------------------------------------------------------------------
    def run(self) -> int:
        mode = self.args.mode
        started = time.perf_counter()
        try:
            result = getattr(self, f"run_{mode}")()
        finally:
            self.log.close()
        self.say(f"done in {time.perf_counter() - started:.1f} s")
        return result

    def columns_read(self, split, training: bool) -> list[str]:
        """The columns the model reads: the negative history only for training SIM or DIEN
        (their auxiliary loss); scoring and DIN never read it, so it is not loaded."""
        from sim_merlin import schema as conventions

        negative = set(split.schema.select_by_tag(conventions.NEGATIVE_HISTORY).column_names)
        if training and self.args.model_type != "din":
            negative = set()
        return [name for name in split.schema.column_names if name not in negative]

    def _first_features(self, split):
        """One small batch (from the whole split, on every worker) to create the variables."""
        loader = split.loader(batch_size=min(self.local_batch, 64))
        try:
            features, _ = next(iter(loader))
        except StopIteration:
            raise FitError(f"{split.path}: no rows to read") from None
        finally:
            if hasattr(loader, "stop"):
                loader.stop()  # otherwise its reader thread keeps filling the queue
        return features

    def run_train(self) -> int:
        from sim_merlin.training.performance import PerformanceCalculator

        a = self.args
        train, test = self.split("train"), self.split("test")
        trainer = self.build(train.schema, self._first_features(train))
        steps = self.dist.allreduce_min(train.batches(
            self.local_batch, self.dist.rank, self.dist.size, a.sharding, a.drop_remainder))
        if steps == 0:
            raise FitError(f"{train.path}: {train.rows} rows give no training batch of "
                           f"{self.local_batch} per worker on {self.dist.size} worker(s)"
                           + (" with --drop_remainder" if a.drop_remainder else ""))
        manager = self._checkpoint_manager()
        start_epoch = int(self.checkpoint.epoch.numpy()) + 1
        if start_epoch >= a.epochs:
            self.say(f"nothing to train: the checkpoint is at epoch {start_epoch - 1} and "
                     f"--epochs is {a.epochs}")
        perf = PerformanceCalculator(a.benchmark_warmup_steps,
                                     a.benchmark_steps if a.benchmark else 0,
                                     reduce_sum=self.dist.allreduce_sum,
                                     num_ranks=self.dist.size)
        time_to_train, last = 0.0, {}
        perf.start()
        upcoming = []  # the next epoch's loader, started before this epoch ends (_train_epoch)
        try:
            for epoch in range(start_epoch, a.epochs):
                epoch_started = time.perf_counter()
                loader = upcoming.pop() if upcoming else self._epoch_loader(train, epoch)

                def start_next(epoch=epoch):
                    if epoch + 1 < a.epochs and not upcoming:
                        upcoming.append(self._epoch_loader(train, epoch + 1))

                self._train_epoch(trainer, loader, steps, epoch, perf, start_next)
                if a.benchmark:
                    # Nothing reads whole tables before the end: deferred Adam rows keep waiting.
                    time_to_train += time.perf_counter() - epoch_started
                    if perf.completed:
                        break
                    continue
                trainer.synchronize()  # every embedding row up to date (deferred Adam steps)
                epoch_time = time.perf_counter() - epoch_started
                time_to_train += epoch_time
                last = self._end_epoch(trainer, manager, train, test, epoch, epoch_time, perf)
        finally:
            for loader in upcoming:
                loader.stop()
        trainer.synchronize()
        replicas = self._compare_replicas(trainer)

        if a.benchmark:
            self._log([], {**_reference_keys(perf.results()), **replicas})
        elif last:
            summary = {"time_to_train": time_to_train}
            summary.update({k: v for k, v in last.items() if k != "epoch_time"})
            self._log([], {**summary, **replicas})
        if a.export_dir and not a.benchmark:
            self.export(trainer.model)
        return 0

    def _compare_replicas(self, trainer) -> dict:
        """With several workers: every worker prints a digest of its weights, and the summary
        says whether all are identical (they must be: same start, same averaged updates)."""
        import hashlib

        import numpy as np

        if self.dist.size == 1:
            return {}
        digest = hashlib.sha256()
        for variable in trainer.model.variables:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
        print(f"worker {self.dist.rank}: weights sha256 {digest.hexdigest()}", flush=True)
        digests = self.dist.allgather(np.frombuffer(digest.digest(), np.uint8).reshape(1, -1))
        identical = bool((digests == digests[0]).all())
        if not identical:
            self.say("warning: the workers' weights differ after training")
        return {"replica_weights_identical": identical}

    def _end_epoch(self, trainer, manager, train, test, epoch, epoch_time, perf) -> dict:
        """Evaluate, checkpoint and log an epoch of training; its record."""
        a = self.args
        performance = perf.results()
        metrics = self.evaluate(trainer, {"test": test} if a.no_train_eval
                                else {"train": train, "test": test})
        self.checkpoint.epoch.assign(epoch)
        if manager is not None and self.dist.is_chief:
            manager.save(checkpoint_number=epoch)
        last = {"epoch_time": epoch_time, **metrics}
        self._log([epoch], {**_reference_keys(performance), **last})
        self.say(f"epoch {epoch}: test AUC {metrics['test_auc']:.4f} (8000 thresholds "
                 f"{metrics['test_auc_8000']:.4f}), test loss {metrics['test_loss']:.4f}, "
                 f"{performance['throughput']:,.0f} samples/s, {epoch_time:.1f} s")
        perf.new_window()
        return last

    def _epoch_loader(self, train, epoch):
        """Epoch ``epoch``'s shuffled loader of this worker's shard, reading from now on."""
        a = self.args
        loader = train.loader(self.local_batch, self.dist.rank, self.dist.size, a.sharding,
                              shuffle=True, seed=self.seed + 1_000_003 * epoch
                              + (self.dist.rank if a.sharding == "rows" else 0),
                              drop_remainder=a.drop_remainder,
                              columns=self.columns_read(train, True))
        return _Started(loader)

    def _train_epoch(self, trainer, loader, steps, epoch, perf, start_next=None):
        """One epoch of ``steps`` steps from ``loader`` (a :class:`_Started`). ``start_next()``
        is called once the loader has read all it will: the next epoch's loader then reads its
        first chunk while this epoch's last batches train, instead of between the epochs (about
        0.2 s per epoch here). Not earlier: the loaders draw their shuffles from numpy's global
        random state, which the next loader reseeds."""
        import numpy as np

        a = self.args
        keys = ("total_loss",) if a.model_type == "din" else (
            "total_loss", "classification_loss", "dien_aux_loss")
        bar = self._progress(steps, f"epoch {epoch}")
        for step, (features, labels) in enumerate(loader.batches()):
            if step >= steps:
                break
            if start_next is not None and loader.finished_reading():
                start_next()
                start_next = None
            losses = trainer.train_step(features, labels)
            values = {"total_loss": float(losses["total_loss"]),
                      "classification_loss": float(losses["classification_loss"]),
                      "dien_aux_loss": float(losses["auxiliary_loss"])}
            if not np.isfinite(values["total_loss"]):
                raise FitError(f"the loss became {values['total_loss']} at epoch {epoch} step "
                               f"{step}; stopped (the last checkpoint, if any, is the last good "
                               "state; try a lower --lr)")
            self.checkpoint.step.assign_add(1)
            rate = perf.step(int(labels.shape[0]))
            record = {k: values[k] for k in keys}
            record["samples/s"] = rate
            self.log.log([epoch, step], record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['total_loss']:.4f}", rate=f"{rate:,.0f}/s")
            elif a.print_every > 0 and step % a.print_every == 0:
                self.out.log([epoch, step], record)
            if a.benchmark and perf.completed:
                break
        if bar is not None:
            bar.close()
        loader.stop()

    def _progress(self, total, description):
        if not self.dist.is_chief or self.args.progress == "off":
            return None
        if self.args.progress == "auto" and not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="step", leave=False)

    def _checkpoint_manager(self):
        import tensorflow as tf

        path = self.args.save_checkpoint_path
        if not path or self.args.benchmark:
            return None
        if self.dist.is_chief:
            os.makedirs(path, exist_ok=True)
            write_json_atomic(os.path.join(path, "model_config.json"),
                               _jsonable(self.model_config))
        return tf.train.CheckpointManager(self.checkpoint, path,
                                          max_to_keep=max(1, self.args.keep_checkpoints))

    def evaluate(self, trainer, splits: dict) -> dict:
        """``<split>_auc`` (exact), ``<split>_auc_8000`` (the reference's), ``<split>_loss``
        (sample-weighted BCE of the prediction) over whole splits, all workers together."""
        import numpy as np

        from sim_merlin.training.metrics import roc_auc, thresholded_roc_auc
        from sim_merlin.training.trainer import binary_cross_entropy

        metrics = {}
        for name, split in splits.items():
            loader = split.loader(self.eval_batch, self.dist.rank, self.dist.size,
                                  self.args.sharding, columns=self.columns_read(split, False))
            logits, labels = trainer.predict_logits(loader)
            logits = self.dist.allgather(logits)
            labels = self.dist.allgather(labels.astype("int64"))
            metrics[f"{name}_auc"] = roc_auc(labels, logits)
            probabilities = (1 / (1 + np.exp(-logits.astype(np.float32)))).astype(np.float32)
            metrics[f"{name}_auc_8000"] = thresholded_roc_auc(labels, probabilities)
            metrics[f"{name}_loss"] = binary_cross_entropy(labels, logits)
            metrics[f"{name}_samples"] = int(labels.size)
        return metrics

    def run_evaluate(self) -> int:
        test = self.split("test")
        trainer = self.build(test.schema, self._first_features(test))
        if not self.args.load_checkpoint_path:
            self.say("warning: no --load_checkpoint_path: evaluating an untrained model")
        self._log([], self.evaluate(trainer, {"test": test}))
        return 0

    def run_inference(self) -> int:
        from sim_merlin.training.performance import PerformanceCalculator

        a = self.args
        train = self.split("train")
        trainer = self.build(train.schema, self._first_features(train))
        perf = PerformanceCalculator(a.benchmark_warmup_steps, a.benchmark_steps,
                                     reduce_sum=self.dist.allreduce_sum,
                                     num_ranks=self.dist.size)
        loader = train.loader(self.eval_batch, self.dist.rank, self.dist.size, a.sharding,
                              columns=self.columns_read(train, False))
        steps = self.dist.allreduce_min(train.batches(self.eval_batch, self.dist.rank,
                                                      self.dist.size, a.sharding))
        perf.start()
        for step, (features, labels) in enumerate(loader):
            if step >= steps:
                break
            trainer.predict_step(features).numpy()
            rate = perf.step(int(labels.shape[0]))
            self.log.log([0, step], {"samples/s": rate})
            if a.print_every > 0 and step % a.print_every == 0:
                self.out.log([0, step], {"samples/s": rate})
            if perf.completed:
                break
        if hasattr(loader, "stop"):
            loader.stop()
        self._log([], _reference_keys(perf.results()))
        return 0

    def run_export(self) -> int:
        train = self.split("train")
        trainer = self.build(train.schema, self._first_features(train))
        if not self.args.load_checkpoint_path:
            self.say("warning: no --load_checkpoint_path: exporting an untrained model")
        if not self.args.export_dir:
            raise FitError("--mode export needs --export_dir")
        self.export(trainer.model)
        return 0

    def export(self, model):
        """Write ``model`` as a SavedModel to --export_dir (atomically, chief only)."""
        if not self.dist.is_chief:
            return
        target = os.path.abspath(self.args.export_dir)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        # Staging named by process: what a killed export left (the new export, or the old one
        # moved aside) is recognised by its dead owner and removed by the next one.
        prefix = f".{os.path.basename(target)}.partial-"
        for name in remove_abandoned(parent, prefix):
            self.say(f"removed {os.path.join(parent, name)} (left by an interrupted export)")
        staging = os.path.join(parent, f"{prefix}{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging)
        try:
            model.save(staging)
            replace_directory(staging, target, f"{staging}.replaced")  # --overwrite
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging, ignore_errors=True)
        self.say(f"exported a SavedModel to {target}")

    def run_predict(self) -> int:
        import numpy as np
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        a = self.args
        if not a.predict_input:
            raise FitError("--mode predict needs --predict_input (a parquet directory with "
                           "schema.pbtxt, as workflows/preprocess.py writes)")
        split = _open_split(a.predict_input)
        if not a.load_checkpoint_path:
            self.say("warning: no --load_checkpoint_path: scoring with an untrained model")
        trainer = self.build(split.schema, self._first_features(split))
        if self.dist.size > 1:
            raise FitError("--mode predict runs on one process")
        loader = split.loader(self.eval_batch, columns=self.columns_read(split, False))
        ids = _id_columns(split.schema)
        columns = {name: [] for name in ids}
        logits, labels_ = [], []
        for features, labels in loader:
            logits.append(trainer.predict_step(features).numpy())
            labels_.append(np.asarray(labels).reshape(-1))
            for name in ids:
                columns[name].append(np.asarray(features[name]).reshape(-1))
        logit = np.concatenate(logits) if logits else np.zeros([0], np.float32)
        table = {name: np.concatenate(v) for name, v in columns.items()}
        if labels_:
            table[split.label] = np.concatenate(labels_)
        table["logit"] = logit
        table["probability"] = (1 / (1 + np.exp(-logit.astype(np.float64)))).astype(np.float32)
        output = a.predict_output or os.path.join(a.results_dir, "predictions.parquet")
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        remove_abandoned(os.path.dirname(os.path.abspath(output)),
                         f"{os.path.basename(output)}.partial-")
        staging = f"{output}.partial-{os.getpid()}"
        pq.write_table(pa.Table.from_pandas(pd.DataFrame(table), preserve_index=False), staging)
        os.replace(staging, output)
        self.say(f"wrote {len(logit):,} predictions to {output}")
        return 0

    def _log(self, step, data: dict):
        self.log.log(step, data)
        self.out.log(step, data)


class _Started:
    """A loader whose reading thread starts now; :meth:`batches` continues it (iterating a
    Merlin loader again would restart it)."""

    def __init__(self, loader):
        self.loader = loader
        self._iterator = iter(loader)

    def batches(self):
        while True:
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            yield batch

    def finished_reading(self) -> bool:
        """The loader has queued its last batch (its reading thread has ended)."""
        finished = getattr(self.loader, "finished_reading", None)
        return True if finished is None else finished()

    def stop(self) -> None:
        if hasattr(self.loader, "stop"):
            self.loader.stop()


def _check_options(a):
    problems = []
    for name in ("global_batch_size", "embedding_dim", "epochs", "top_k", "esu_heads",
                 "inference_shards"):
        if getattr(a, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(a, name)}")
    if a.eval_batch_size is not None and a.eval_batch_size <= 0:
        problems.append(f"--eval_batch_size must be positive, got {a.eval_batch_size}")
    if a.benchmark_warmup_steps < 0:
        problems.append(f"--benchmark_warmup_steps must be >= 0, got {a.benchmark_warmup_steps}")
    if a.dropout_rate >= 1:
        problems.append(f"--dropout_rate must be < 1, got {a.dropout_rate}")
    if a.keep_checkpoints <= 0:
        problems.append(f"--keep_checkpoints must be positive, got {a.keep_checkpoints}")
    if problems:
        raise FitError("; ".join(problems))


def _check_outputs(a):
    """Refuse, before any work, to replace what an earlier run wrote (unless --overwrite)."""
    if a.overwrite:
        return
    if a.export_dir and (a.mode == "export" or (a.mode == "train" and not a.benchmark)) \
            and os.path.exists(a.export_dir):
        raise FitError(f"--export_dir {a.export_dir} already exists; choose another or pass "
                       "--overwrite")
    if a.mode == "predict":
        output = a.predict_output or os.path.join(a.results_dir, "predictions.parquet")
        if os.path.exists(output):
            raise FitError(f"--predict_output {output} already exists; choose another or pass "
                           "--overwrite")
    path = a.save_checkpoint_path
    if a.mode == "train" and path and not a.benchmark and glob.glob(os.path.join(path, "*.index")):
        resuming = a.load_checkpoint_path and os.path.realpath(
            a.load_checkpoint_path if os.path.isdir(a.load_checkpoint_path)
            else os.path.dirname(a.load_checkpoint_path)) == os.path.realpath(path)
        if not resuming:
            raise FitError(f"--save_checkpoint_path {path} holds another run's checkpoints; "
                           f"pass --load_checkpoint_path {path} to resume it, or --overwrite "
                           "to start over there")


def _open_split(path: str):
    """:func:`open_split`, and the schema checked against what the models read; errors name
    the file."""
    from sim_merlin.blocks.inputs import SchemaMismatchError, SequenceLayout
    from sim_merlin.training.data import DatasetError, open_split

    try:
        split = open_split(path)
    except DatasetError as error:
        raise FitError(str(error)) from error
    try:
        SequenceLayout(split.schema)
    except SchemaMismatchError as error:
        raise FitError(f"{os.path.join(path, 'schema.pbtxt')}: {error} (tags and conventions: "
                       "schemas/README.md)") from error
    return split


def _reference_keys(results: dict) -> dict:
    from sim_merlin.training.performance import REFERENCE_RESULT_KEYS

    return {k: results[k] for k in REFERENCE_RESULT_KEYS if k in results}


def _id_columns(schema) -> list[str]:
    from merlin.schema import Tags

    names = schema.select_by_tag(Tags.USER_ID).column_names + \
        schema.select_by_tag(Tags.ITEM_ID).column_names
    scalar = [n for n in names if not schema[n].is_list]
    return scalar


def _count(variables) -> int:
    return int(sum(math.prod(v.shape) for v in variables))


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


if __name__ == "__main__":
    sys.exit(main())
