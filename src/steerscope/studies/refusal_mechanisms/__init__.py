"""Refusal study, part 2: why steering works (EAP-IG circuits, frozen attention, svv, sparsification)."""
