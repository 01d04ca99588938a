"""ribray: the Local Interaction Basis (Bushnaq et al., 2024) as a distributed batch job on Ray."""

__version__ = "0.1.0"
