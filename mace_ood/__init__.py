"""mace-ood: find the structures a MACE model ensemble does not understand (plan -> extract -> score -> select -> report)."""
