"""Taming-DiT's KD-guided tri-level pruning (Sec. 4.2): block, head and FFN masks chosen from
group-wise candidate sets, feature alignment KD (Eq. 5-6), and conversion to a dense compact model."""
