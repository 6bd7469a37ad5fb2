"""CheXanatomy-style anatomy tokens (Gatidis et al. 2026).

A vision-language model emits each structure as text tokens: its box as 4 location tokens
(``<locNNNN>``: ymin, xmin, ymax, xmax on 1024 bins) followed by 16 mask tokens (``<segNNN>``:
codebook indices of a small VQ-VAE that encodes the mask cropped to its box and resized to 64x64).
See :mod:`rau.chex.masktok` (imported lazily: it needs torch).
"""
