"""The demo: its task suites (the synthetic demo suite, the BIG-bench real tasks), the trainer that
builds their adapter libraries (`zoo`) and the `demo` command. The core (library ... server,
merging, eval, bench) never imports this package; it only reads the committed libraries through
`loraswitch.constants`.
"""
