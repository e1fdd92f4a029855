"""The inversion fingerprint: token entropy, per-token logit-gradient strengths, correlations, metric."""
