"""Reports over experiments: the paper's Table 1 from seeds of DVC experiments (:mod:`.table1`)."""
