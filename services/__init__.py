"""The three CollaFuse services over the shared core, and their local stack.

- :mod:`collafuse.services.coordinator`: the aggregation coordinator (control plane);
- :mod:`collafuse.services.server`: the server denoiser, serving (:mod:`.server.app`) and
  training (:mod:`.server.trainer`) roles;
- :mod:`collafuse.services.site`: the site runner, one per site;
- shared: :mod:`.http` (app factory, errors, auth), :mod:`.metrics` (Prometheus),
  :mod:`.client` (service-to-service calls with retries), :mod:`.settings` (environment and
  config file), :mod:`.cli` (the commands) and :mod:`.stack` (the local stack).

Importing this package does nothing but define things.
"""
