"""`loraswitch serve --ray`: the same OpenAI-compatible app on Ray Serve, many replicas, one API.

Each replica (`replica.Replica`) is a whole loraswitch server — the app of `server.app` with its
own bounded queue and batching worker — called in-process through ASGI (`asgi`), so every
endpoint answers exactly as the single server does. The ingress (`ingress`) is a thin FastAPI
proxy: it places each request on a replica by Serve's model multiplexing (the adapter a request
names), retries a request whose replica died before it answered, and fans the library changes
and the metrics out over the cluster through one small actor (`cluster.Library`). `launch`
starts Ray and Serve and runs the application. See docs/scale-out.md.

Nothing here is imported unless `--ray` is given: the plain server needs no Ray.
"""
