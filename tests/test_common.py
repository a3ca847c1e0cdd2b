"""mmctr.common's writes: a crash mid-write leaves the old file or none, and no temporary; the next
write sweeps the temporaries dead writers left; an output folder that is a file or cannot be
written is one line before any work."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mmctr import blend
from mmctr import common
from helpers import assert_user_error


def parquet_writer_dies_half_way(self, path, *args, **kwargs):
    Path(path).write_bytes(b"PAR1" + b"\0" * 500)
    raise OSError("disk full (simulated)")


def text_writer_dies_half_way(self, text, *args, **kwargs):
    self.write_bytes(text[: len(text) // 2].encode())
    raise OSError("disk full (simulated)")


def torch_save_then_killed(path: Path) -> None:
    with common.atomic_path(path) as tmp:
        torch.save({"w": torch.zeros(1000)}, tmp)
        raise OSError("killed after the write, before the rename (simulated)")


WRITERS = {
    # writer: (the write, what dies half way through it)
    "write_parquet": (lambda path: common.write_parquet(path, pd.DataFrame({"a": np.arange(1000)})),
                      (pd.DataFrame, "to_parquet", parquet_writer_dies_half_way)),
    "write_json": (lambda path: common.write_json(path, {"a": list(range(1000))}),
                   (Path, "write_text", text_writer_dies_half_way)),
    "write_yaml": (lambda path: common.write_yaml(path, {"a": list(range(1000))}),
                   (Path, "write_text", text_writer_dies_half_way)),
    "write_text": (lambda path: common.write_text(path, "x" * 1000),
                   (Path, "write_text", text_writer_dies_half_way)),
    "atomic_path": (torch_save_then_killed, None),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_mid_write_leaves_the_old_file_or_none_and_no_temporary(tmp_path, monkeypatch, writer,
                                                                         existing):
    write, dies = WRITERS[writer]
    target = tmp_path / "out" / "file.bin"
    if existing:
        target.parent.mkdir()
        target.write_bytes(b"the previous, complete file")
    if dies:
        monkeypatch.setattr(*dies)
    with pytest.raises(OSError, match="simulated"):
        write(target)
    monkeypatch.undo()
    if existing:
        assert target.read_bytes() == b"the previous, complete file"
    else:
        assert not target.exists()
    assert [q.name for q in target.parent.iterdir()] == (["file.bin"] if existing else [])


def test_leftover_temporaries_of_dead_writers_are_swept_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_file = tmp_path / f".metrics.json.{dead}.x1y2.tmp"
    live_file = tmp_path / f".metrics.json.{os.getpid()}.a1b2.tmp"  # a writer still at work
    stale_folder = tmp_path / f".blend-tmp-{dead}-z9"
    for path in (stale_file, live_file):
        path.write_text("half")
    (stale_folder / "sub").mkdir(parents=True)
    common.write_json(tmp_path / "metrics.json", {"a": 1})
    assert not stale_file.exists() and live_file.exists()
    with common.staged_folder(tmp_path / "blend") as staged:
        (staged / "report.md").write_text("new")
    assert not stale_folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_file.name, "metrics.json", "blend"])


def test_a_staged_folder_keeps_an_earlier_result_of_other_bytes_aside(tmp_path):
    final = tmp_path / "blend"

    def publish(pred: str, report: str):
        with common.staged_folder(final, result_files=("test.parquet",)) as staged:
            (staged / "test.parquet").write_text(pred)
            (staged / "report.md").write_text(report)

    publish("p1", "first")
    publish("p1", "same predictions, another report")  # the same result: replaced
    assert [p.name for p in tmp_path.iterdir()] == ["blend"]
    assert (final / "report.md").read_text() == "same predictions, another report"
    publish("p2", "other predictions")  # another result: the earlier one is kept aside, whole
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("blend.old-")]
    assert (aside / "test.parquet").read_text() == "p1" and (aside / "report.md").read_text().startswith("same")
    assert (final / "test.parquet").read_text() == "p2"


def test_outputs_in_a_file_or_an_unwritable_place_are_one_line_before_any_work(pipeline, tmp_path, one_thread):
    p = pipeline
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cfg = copy.deepcopy(p.blend_cfg)
    cfg["blend"]["submission"]["dir"] = str(a_file)
    assert_user_error(lambda: blend.run_blend(cfg), str(a_file), "blend.submission.dir", "must be a folder")
    cfg["blend"]["submission"]["dir"] = str(a_file / "below")
    assert_user_error(lambda: blend.run_blend(cfg), "blend.submission.dir", "cannot be written")
