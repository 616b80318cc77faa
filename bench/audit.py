"""The inversion audit as a bench item: `sfp-audit` itself (simulation/audit.py), so both give the same numbers."""
from simulation.cli import audit_main

if __name__ == "__main__":
    audit_main()
