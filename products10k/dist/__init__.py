"""Where the torch-side stages run: devices and autocast (``devices.py``), the process group and its
collectives (``group.py``), and the launcher that starts a stage as one process or under torchrun on
one node or several (``launch.py``, what dvc.yaml calls; named after params.yaml's ``dist``)."""
