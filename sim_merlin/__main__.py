"""``python -m sim_merlin``: print the environment report (versions, GPU, which path is taken)."""
from sim_merlin.environment import report

if __name__ == "__main__":
    table = report()
    width = max(map(len, table))
    for key, value in table.items():
        print(f"{key:<{width}}  {value}")
