"""Updates of the one-shot walk: one file each, registered in secateurs.oneshot.registry."""
