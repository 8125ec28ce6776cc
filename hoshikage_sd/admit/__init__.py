"""Admission's side effects and inputs, around the pure decision (policy/admission.py).

`needs` is what a model will hold (its estimates, remembered in the runtime directory);
`gather` reads the machine once into a Snapshot (the models up, their activity, ranks and
pins, MemAvailable, the GPU devices); `act` carries a Decision out (the journal record and
its counts, the evictions, the RPC workers asked). A caller holds the admission lock,
gathers, calls policy.admission.decide once, and acts: Router.prepare, the model unit's
activator.
"""
