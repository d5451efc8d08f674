"""Scale-out on Ray Serve (``prolora-serve serve --replicas N``).

N engine replicas (``replica.py``: one in-process ``AsyncLLMEngine`` each, reading the shared
adapter directory) behind one ingress deployment serving the same FastAPI app
(``server/api/app.py:create_app``) with a second ``EngineClient``, ``RayEngineClient``
(``ray_client.py``), that reaches the replicas through Ray Serve handles. Requests on an adapter
carry the adapter id as Ray Serve's multiplexed model id, so Ray's router sends them to a
replica that holds it. ``deploy.py`` starts (or joins) the cluster and runs the application.

Only ``aggregate.py`` and ``protocol.py`` import without Ray; nothing outside this package imports
it unless ``--replicas`` is given (Ray is an optional extra).
"""
