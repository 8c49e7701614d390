"""The users' benchmark, `python -m serve_app.tools.bench speed|memory`: this machine's speed and memory.

One command, its in-process parts, its server part and one report writer; the campaign harnesses (the frame
loop, the kernel counter, ...) are in the checkout's ops/bench/, outside the shipped package.
"""
