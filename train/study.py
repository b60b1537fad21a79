"""The search behind a sweep: an Optuna study in a journal file that only needs a shared filesystem.

The study decides, the trainer reports (Optuna's ask-and-tell): `python -m train.sweep` asks for a trial and
tells its end; the trial's training process (its rank 0) reports the metric once per epoch and asks whether
to stop (`TrialReporter`). Nothing else is shared.

Storage: `study.journal` in the sweep folder, Optuna's JournalFileBackend with its symlink lock (atomic on
every NFS version; a lock left by a killed process is broken after LOCK_GRACE seconds; a record a dying
writer left half-written is cut off by the next writer, drop_torn_record), or a database URL
(`--storage`, Optuna's RDBStorage: for hundreds of workers, where one file's lock would be the bottleneck).
Samplers: grid -> GridSampler (trial n takes grid point n, so concurrent workers never duplicate one);
random -> RandomSampler, bayes -> TPESampler, each seeded per trial from (seed, trial number), so the same
seed gives the same parameters whatever the number of workers (for bayes: when trials run one at a time).
early_terminate hyperband -> SuccessiveHalvingPruner (W&B's hyperband is one successive-halving bracket):
a trial is first judged after min_iter epochs, then after min_iter * eta, ...; the rest are not pruned.
"""

import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from train.errors import UsageError
from train.sweep_config import Sweep, load_sweep

JOURNAL = "study.journal"
STUDY = "sweep"  # one study per sweep folder
STORAGE_ENV = "CIFAR_SWEEP_STORAGE"  # a database URL (--storage) instead of the journal
SWEEP_FILE = "sweep.yaml"  # the sweep file, as given, kept in its folder: every worker and trial reads it
LOCK_GRACE = 60  # seconds an unchanged lock file is waited for before it counts as left by a dead process
_U = (1e-6, 1 - 1e-6)  # normal-type parameters are drawn as a quantile u, then mapped: u=0 or 1 is infinite


def load_optuna():
    """Optuna, imported on first use (only sweeps need it), quiet but for warnings; one line if not installed."""
    try:
        import optuna
    except ImportError:
        raise UsageError("sweeps need Optuna: pip install -e \".[sweep]\"") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_for(folder: Path):
    """The study's storage: the database of STORAGE_ENV when the sweep was started with --storage URL (the
    worker sets it for its trials: a URL may hold a password, so it is kept out of files), else the journal."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if os.environ.get(STORAGE_ENV):
        return _database(os.environ[STORAGE_ENV])
    path = str(folder / JOURNAL)

    class Lock(JournalFileSymlinkLock):
        """Optuna's symlink lock, which only writers take; once it is held, a torn last record is cut off."""

        def acquire(self) -> bool:
            acquired = super().acquire()
            try:
                if acquired:
                    drop_torn_record(path)
            except BaseException:  # Optuna releases only after a successful acquire
                self.release()
                raise
            return acquired

    return JournalStorage(JournalFileBackend(path, lock_obj=Lock(path, grace_period=LOCK_GRACE)))


def drop_torn_record(path: str) -> None:
    """Cut off a last record that lacks its newline: what a writer that died mid-write leaves (a lost NFS
    client, a full disk). Readers skip such a record, but the next append would join it and the new record
    into one unreadable line, and from then on every read of the study would fail. Call it holding the lock."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        keep, pos = 0, end
        while pos > 0 and not keep:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            newline = f.read(step).rfind(b"\n")
            keep = pos - step + newline + 1 if newline >= 0 else 0
            pos -= step
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    print(f"warning: {path} ended in a record cut short ({end - keep} bytes, its writer died mid-write): "
          f"dropped it", file=sys.stderr, flush=True)


def _database(url: str):
    from optuna.storages import RDBStorage

    try:
        return RDBStorage(url)
    except Exception as e:  # sqlalchemy's errors: a bad URL, no driver, no server
        shown = url.split("://")[0] + "://..." + url.split("@")[-1] if "@" in url else url  # no password
        raise UsageError(f"--storage {shown}: {str(e).replace(url, shown).splitlines()[0]}") from None


def has_study(folder: Path) -> bool:
    """Whether a folder is a search sweep's (python -m train.sweep keeps the sweep file in it)."""
    return (folder / SWEEP_FILE).is_file() and ((folder / JOURNAL).is_file() or bool(os.environ.get(STORAGE_ENV)))


def open_study(sweep: Sweep, folder: Path, seed: int):
    """Create the folder's study, or load it when another worker did (creation is race-free in the journal)."""
    optuna = load_optuna()
    study = optuna.create_study(study_name=STUDY, storage=storage_for(folder), sampler=_sampler(sweep, seed, 0),
                                pruner=pruner(sweep), direction=sweep.goal, load_if_exists=True)
    if study.direction.name.lower() != sweep.goal:
        raise UsageError(f"the study in {folder} was created to {study.direction.name.lower()}, the sweep file "
                         f"says {sweep.goal}: use another sweep folder")
    return study


def _sampler(sweep: Sweep, seed: int, number: int):
    optuna = load_optuna()
    if sweep.method == "grid":
        return optuna.samplers.GridSampler({p.name: p.grid() for p in sweep.parameters}, seed=seed)
    trial_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed)
    return optuna.samplers.TPESampler(seed=trial_seed)


def pruner(sweep: Sweep):
    optuna = load_optuna()
    if not sweep.min_iter:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.min_iter, reduction_factor=sweep.eta,
                                                  min_early_stopping_rate=0)


def suggest(study, trial, sweep: Sweep, seed: int) -> dict:
    """The trial's options {Config field: value}, drawn in the file's order by a sampler seeded for this trial."""
    if sweep.method != "grid":
        study.sampler = _sampler(sweep, seed, trial.number)  # read lazily, at the first suggestion
    return {p.name: _draw(trial, p) for p in sweep.parameters}


def _draw(trial, p):
    if p.distribution in ("constant", "categorical"):
        if len(p.values) == 1:
            return p.values[0]
        return trial.suggest_categorical(p.name, list(p.values))
    whole = p.kind is int
    if p.distribution == "int_uniform":
        return trial.suggest_int(p.name, int(p.min), int(p.max))
    if p.distribution == "q_uniform":
        if whole:
            return trial.suggest_int(p.name, int(p.min), int(p.max), step=int(p.q))
        return trial.suggest_float(p.name, p.min, p.max, step=p.q)
    if p.distribution in ("log_uniform_values", "inv_log_uniform_values"):
        return trial.suggest_float(p.name, p.min, p.max, log=True)
    if p.distribution == "uniform":
        return trial.suggest_float(p.name, p.min, p.max)
    if p.distribution == "q_log_uniform_values":  # Optuna has no log scale with a step: round as W&B does
        value = round(trial.suggest_float(p.name, p.min, p.max, log=True) / p.q) * p.q
        return int(value) if whole else value
    u = trial.suggest_float(f"{p.name}:quantile", *_U)  # normal, q_normal, log_normal
    value = statistics.NormalDist(p.mu, p.sigma).inv_cdf(u)
    if p.distribution == "log_normal":
        value = math.exp(value)
    if p.distribution == "q_normal":
        value = round(value / p.q) * p.q
        value = int(value) if whole else value
    return value


class TrialReporter:
    """The training side of one trial (rank 0 only): report the metric at each epoch end, ask whether to stop.
    The pruner is not stored in the study: it is built again from the sweep file the folder keeps."""

    def __init__(self, folder: str, number: int):
        optuna = load_optuna()
        folder = Path(folder)
        self.sweep = load_sweep(str(folder / SWEEP_FILE))
        self.study = optuna.load_study(study_name=STUDY, storage=storage_for(folder), pruner=pruner(self.sweep))
        frozen = self.study.get_trials(deepcopy=False)[number]
        self.trial = optuna.trial.Trial(self.study, frozen._trial_id)
        self.reported = set(frozen.intermediate_values)  # a resumed trial reports only the epochs it lacked

    def epoch_end(self, record: dict) -> bool:
        """Report the epoch's metric (once: a resumed trial repeats none); return whether to stop here."""
        epoch = record["epoch"]
        if epoch not in self.reported:
            self.trial.report(record[self.sweep.record_key], epoch)
            self.reported.add(epoch)
        return self.trial.should_prune()
