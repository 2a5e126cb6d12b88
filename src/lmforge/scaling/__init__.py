"""`lmforge scaling`: train a grid of model sizes x token budgets, fit L(N, D) = E + A/N^alpha + B/D^beta, and read
off the compute-optimal model size and token count for a FLOP budget (Hoffmann et al. 2022, "Chinchilla")."""
