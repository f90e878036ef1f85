"""Training and measurement on a device: NOLA training (:mod:`.nola`) and Fisher information per
singular component (:mod:`.fisher`). Kept apart from the load/materialize/apply path."""
