"""S2DiT's sandwich architecture search (supplement A): fixed-k routers trained by self-distillation
(Eq. 10) from an all-self-attention teacher, then a budget-constrained DP over the C(n-2, k) layouts."""
