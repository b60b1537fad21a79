"""The study's journal file (a real Optuna journal on disk) outlives a writer that died mid-write (quick)."""

import optuna
import pytest

from train.study import JOURNAL, STUDY, storage_for

TORN = b'{"op_code":6,"worker_id":"dead-worker","trial_id":0,"sta'  # half a record, without its newline
LONG = b'{"op_code":8,"worker_id":"dead-worker","trial_id":0,"user_attr":{"log":"' + b"x" * 150_000  # > 2 chunks


@pytest.mark.parametrize("torn", [TORN, LONG], ids=["short", "longer-than-a-read"])
def test_a_record_torn_by_a_dead_writer_is_dropped_and_the_study_goes_on(tmp_path, capsys, torn):
    study = optuna.create_study(study_name=STUDY, storage=storage_for(tmp_path))
    study.tell(study.ask(), 1.0)
    journal = tmp_path / JOURNAL
    whole = journal.read_bytes()
    with open(journal, "ab") as f:  # a lost NFS client, a full disk: the write stopped halfway
        f.write(torn)
    worker = optuna.load_study(study_name=STUDY, storage=storage_for(tmp_path))  # the next worker
    worker.tell(worker.ask(), 2.0)
    again = optuna.load_study(study_name=STUDY, storage=storage_for(tmp_path))
    assert [t.value for t in again.trials] == [1.0, 2.0]
    assert journal.read_bytes().startswith(whole) and torn not in journal.read_bytes()
    assert f"{journal} ended in a record cut short ({len(torn)} bytes" in capsys.readouterr().err


def test_a_whole_journal_is_left_as_it_is(tmp_path, capsys):
    study = optuna.create_study(study_name=STUDY, storage=storage_for(tmp_path))
    study.tell(study.ask(), 1.0)
    whole = (tmp_path / JOURNAL).read_bytes()
    study.tell(study.ask(), 2.0)
    assert (tmp_path / JOURNAL).read_bytes().startswith(whole)
    assert "cut short" not in capsys.readouterr().err
