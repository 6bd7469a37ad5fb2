"""The compact RAU VLM (reference + target -> per-structure answer, box and mask tokens)."""
