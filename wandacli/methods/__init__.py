"""One file per attribution method: its score math as pure tensor functions, the hooks that
gather the statistics it needs, and its class for the run (methods/base.py).

Every score is shaped like the weight it scores, [out_features, in_features], float32.

- wanda:     |W| · sqrt(s),  s_j = (1/N) Σ_samples Σ_counted tokens x_j²  (x: the layer's input)
- wandg:     |W| · Σ_samples |∂L_n/∂W|  (SNIP; L_n: mean cross-entropy over sample n's
             counted tokens)
- magnitude: |W|
- random:    uniform [0, 1), seeded per (seed, layer, module) so any subset can be recomputed

`|W|` is `|W - W_base|` under `--use-diff`.
"""
