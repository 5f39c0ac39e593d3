"""Flower (1.42) as a second engine of ``patchsvdd.experiment``, in its own environment (``make flower-install``).

Flower ships an app's code (a FAB) from whoever submits a run to the SuperLink and on to every SuperNode,
which would install and run it. Here nobody runs a FAB: the FAB is only the app's name.

- ``app``: the project's app as a FAB, built the same way from the installed code wherever it is built; its
  SHA-256 (``app_hash``) names this project's code at this version.
- ``site``: what runs beside a SuperNode (``envoy_folder/start_supernode.sh``): it takes each task the
  SuperNode receives, refuses it unless the run's FAB is the site's own build, and otherwise runs this
  project's tasks (``federated.site_tasks``) from its own code on a manifest and weights, which it checks.
- ``driver``: the data scientist's side (``FlowerEngine``): submits a run of the app, runs its ServerApp
  role in the caller's process (FedAvg with the project's remedies, metrics per round) and hands
  ``patchsvdd.experiment`` what OpenFL's engine hands it. The SuperLink runs no app code at all.
- ``records``: the manifest and weights as Flower records, and back, checked.

Only this subpackage imports ``flwr``; it imports nothing of OpenFL.
"""
