"""The data stages' mix (data_integration.py, data_set_generation.py), one module per step a row goes through:

1. plan.py       the config checked; one bucket per RATIOS key, its exact quota and the sources that fill it
2. sources.py    each source: a hub spec or local files (Source)
   reading.py    a local file's rows, numbered, and the seeded shuffle buffer every source is drawn through
   parquet.py    local Parquet files drawn as row positions, handed to the workers as Arrow
   hub.py        a hub dataset streamed at a resolved commit, retried when the connection is lost
3. schemas.py    each source's adapter: a raw row to instruction/input/output, a conversation or a record
4. rows.py       a row converted (ConvertedRow), cleaned, length-filtered, keyword-matched and keyed (PreparedRow)
   workers.py    chunks of rows prepared in worker processes
5. drawing.py    each source drawn into its buckets: duplicates dropped, every row read accounted for (Mixer)
6. stage.py      mix(): the whole stage, the shuffled output written with its manifest
   work_state.py  what a run stopped by a lost hub stream saves, so that the same command continues it
"""
