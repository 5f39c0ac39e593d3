"""OpenFL 1.7.1 as an engine of ``patchsvdd.experiment`` (the seed's path and the default): a director and envoys.

- ``engine``: ``OpenFLEngine``, what ``patchsvdd.experiment`` drives;
- ``client``: the data scientist's side of the director; ``monitor``: following an experiment;
- ``tasks``: OpenFL's wrapping of the site's tasks (``federated.site_tasks``);
- ``review``, ``site_build``, ``site_guard``: what a site takes from a client, checked, and builds itself;
- ``fx``: OpenFL's command line with its fixed waits cut; ``local``: a director and envoys on this machine.

Only this subpackage imports ``openfl``; it imports nothing of Flower.
"""
