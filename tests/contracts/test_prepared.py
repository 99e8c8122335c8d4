"""The prepared-data contract's reader: errors name file, row and column; labels match the map."""

import numpy as np
import pandas as pd
import pytest

from products10k.common import DataError
from products10k.contracts.prepared import read_label_map, read_prepared
from tests.helpers import make_eval_data, make_training_data


def test_prepared_csv_errors_name_file_row_and_column(tmp_path):
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=2)
    df = pd.read_csv(data / "train.csv")
    df.drop(columns=["offset"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DataError, match=r"a\.csv: missing column 'offset'"):
        read_prepared(tmp_path / "a.csv")
    df.assign(label=[0, 1, 5, 1]).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match=r"b\.csv: row 4 column 'label' is 5"):
        read_prepared(tmp_path / "b.csv", read_label_map(data / "label_map.csv"))
    df.assign(label=[0, -1, 1, 1]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c\.csv: row 3 column 'label' is -1"):
        read_prepared(tmp_path / "c.csv")  # -1 (SKU unknown to training) only in the test split
    df.assign(offset=df["offset"].astype(float) + 0.5).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"d\.csv: row 2 column 'offset' is .*non-negative integer"):
        read_prepared(tmp_path / "d.csv")
    pd.DataFrame({"label": [0, 2], "sku": [1, 2]}).to_csv(tmp_path / "lm.csv", index=False)
    with pytest.raises(DataError, match=r"lm\.csv: column 'label'"):
        read_label_map(tmp_path / "lm.csv")


def test_read_prepared_checks_labels_and_skus_against_the_label_map(tmp_path):
    prepared = make_eval_data(tmp_path / "prepared")  # its test split holds a SKU train lacks
    label_map = read_label_map(prepared / "label_map.csv")
    val = pd.read_csv(prepared / "val.csv")
    val.loc[2, "label"] = 7
    val.to_csv(tmp_path / "val.csv", index=False)
    with pytest.raises(DataError, match=r"val.csv: row 4 column 'label' is 7"):
        read_prepared(tmp_path / "val.csv", label_map)
    val = pd.read_csv(prepared / "val.csv")
    val.loc[1, "sku"] = 4242
    val.to_csv(tmp_path / "val.csv", index=False)
    with pytest.raises(DataError, match=r"row 3: label 1 has sku 4242, but the label map says sku 1002"):
        read_prepared(tmp_path / "val.csv", label_map)
    with pytest.raises(DataError, match="missing column 'Usage'"):
        read_prepared(prepared / "val.csv", label_map, usage=True)
    assert np.all(read_prepared(prepared / "test.csv", label_map, usage=True)["label"].to_numpy()[-1] == -1)
