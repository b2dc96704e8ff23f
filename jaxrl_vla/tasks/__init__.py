"""Task tooling around the JAX-native envs: scripted-expert demonstrations.

`jaxrl_vla.tasks.demos` runs an env's privileged expert over vmapped episodes
and saves them as a flat .npz that behaviour cloning (torch or JAX) reads.
Nothing here imports torch.
"""
