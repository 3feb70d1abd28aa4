"""The one-shot walk and its stages: allocations, pruners, refiners and weight updates (see ``stage``)."""
