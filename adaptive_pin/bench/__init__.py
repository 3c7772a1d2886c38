"""``adaptive-pin bench``: every scenario under every policy, side by side, against targets.

runner.py runs the grid (scenario x policy x seed) through the simulator; settle.py reads
migrations and settling out of each run; optimal.py searches the best placement exhaustively
where that is small enough; decision_time.py times one decision on a 512-PU host; targets.py
judges the figures; report.py prints them. docs/bench.md defines every figure.
"""
