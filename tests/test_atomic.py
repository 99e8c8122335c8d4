import pandas as pd
import pytest

from products10k.atomic import atomic_path, write_csv, write_json


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


def test_write_csv_no_index(tmp_path):
    target = tmp_path / "sub" / "x.csv"
    write_csv(target, pd.DataFrame({"name": ["1.jpg"], "class": [3]}))
    assert target.read_text().splitlines() == ["name,class", "1.jpg,3"]
