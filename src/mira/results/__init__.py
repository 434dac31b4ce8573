"""Everything mira writes and reads back about runs; nothing here imports torch or flwr.

Modules, each importing only those above it:

* ``errors``   -- ResultsError and its kinds, all MiraErrors (one line for the user)
* ``files``    -- write_atomic: the one way a results file reaches the disk; strict JSON
* ``schema``   -- the rows of metrics.jsonl (ClientRow, RoundRow) and their codec; the file
  names of a run and a comparison directory (RunLayout, ComparisonLayout)
* ``document`` -- the table model and blocks; markdown and self-contained HTML renderings
* ``stats``    -- numbers from metric rows: per round, per run, over seeds, curves
* ``plots``    -- matplotlib figures from numbers
* ``rundir``   -- the run directory: its writer, lock, metrics rows, checkpoint
* ``runs``     -- reading runs and comparison directories back
* ``tables``   -- the tables of a run or a comparison
* ``diff``     -- ``mira diff``: where two runs differ most
* ``report``   -- ``mira report`` and comparison.csv / comparison.md

Running the method x seed grid of ``mira compare`` is :mod:`mira.experiments.compare`; it
writes through these modules, which never import it.
"""
