"""The exercises of each notebook, one module per notebook: `nbNN.py` registers exercises named "NN.name".

`ernie_lab.exercises.check("NN.name", ...)` imports `nbNN` on first use; a new notebook's exercises go
into a new `nbNN.py` here (found automatically), its solutions into `solutions/NN_name.py`.
"""

import pkgutil

MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("nb"))
