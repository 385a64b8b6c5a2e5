"""The names of things under ``models/``: one home for every file, lock, stamp and temp name.

Pure constants, imported by the store, the planner, the watcher, the workers and the settings;
nothing here touches the disk. A name that means something on disk is defined here and nowhere
else (the variants' file names are ``variants.VARIANT_FILES``; ``FP32_FILE`` is one of them).
"""

from __future__ import annotations

from .variants import FP32, VARIANT_FILES

#: what each model folder holds besides its variants
MANIFEST_NAME = "manifest.json"
FP32_FILE = VARIANT_FILES[FP32]
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.json"

#: in ``models/`` itself: one daemon per store holds this lock (its pid inside)
LOCK_NAME = ".modeld.lock"
#: its mtime is when the scrub last went through every file (the schedule outlives restarts:
#: a robot that is switched off every night still gets scrubbed)
SCRUB_STAMP_NAME = ".modeld.scrubbed"

#: a file being written (renamed to its final name when complete); removed by every clean-up
TEMP_PREFIX = ".modeld-tmp-"
#: a worker's scratch folder inside a model folder; removed by every clean-up
WORK_PREFIX = ".modeld-work-"
#: what was found in the way of a final name (a folder where a file belongs, a model folder that
#: is a file or a symlink) is renamed to this prefix, never deleted: hidden from scans, and not a
#: temp name, so no clean-up removes what a person may want back
QUARANTINE_PREFIX = ".modeld-quarantine-"

#: the daemon's own names in ``models/``: a change to one of them is not a change of a model
OWN_NAMES = frozenset({LOCK_NAME, SCRUB_STAMP_NAME})
