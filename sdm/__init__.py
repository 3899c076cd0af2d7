"""SDM: Sequential Deep Matching (Lv et al., CIKM 2019)."""
