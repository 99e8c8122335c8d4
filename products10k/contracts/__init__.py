"""The file contracts every stage family reads, on one low floor: the four raw files and the zip-slip
rule (:mod:`.raw`), the prepared CSVs and their one reader (:mod:`.prepared`), the packed image
shards (:mod:`.shards`), the preprocessing constants a checkpoint is trained and served with
(:mod:`.preprocessing`), and the Kaggle CLI both ends of the pipeline call (:mod:`.kaggle`).

Training, evaluation, retrieval, submission and export stand side by side on these, so none of them
imports another family (or the stage that writes the files) for a column list or a constant.
"""
