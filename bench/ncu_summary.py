#!/usr/bin/env python3
"""Summarise one Nsight Compute report (ncu --set full): key throughput metrics, warp-stall
reasons, and the SASS lines holding the most stall samples.

    python3 bench/ncu_summary.py REPORT.ncu-rep

Also writes REPORT.lines.tsv: every SASS line (index, share of the stall samples, its two main
stall reasons, the instruction), for bucketing by region (main loop, epilogue, tile hand-off).
"""
import csv
import io
import subprocess
import sys

METRICS = (
    'gpu__time_duration.sum', 'launch__grid_size', 'launch__registers_per_thread',
    'sm__throughput.avg.pct_of_peak_sustained_elapsed',
    'sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active',
    'sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active',
    'sm__inst_executed_pipe_tensor_op_gmma.sum', 'smsp__inst_executed.sum',
    'smsp__issue_active.avg.pct_of_peak_sustained_active',
    'sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active',
    'sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active',
    'sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active',
    'l1tex__data_pipe_lsu_wavefronts_mem_shared.sum',
    'l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum',
    'lts__throughput.avg.pct_of_peak_sustained_elapsed',
    'dram__throughput.avg.pct_of_peak_sustained_elapsed',
    'sm__warps_active.avg.per_cycle_active', 'smsp__cycles_active.avg',
)


def ncu_csv(*args):
    out = subprocess.run(['ncu', '-i', REP, *args, '--csv'], capture_output=True, text=True).stdout
    return list(csv.reader(io.StringIO(out)))


REP = sys.argv[1]
rows = ncu_csv('--page', 'raw')
head, units = rows[0], rows[1]
for r in rows[2:]:
    print('KERNEL', (r[head.index('Kernel Name')] if 'Kernel Name' in head else '?')[:120])
    stalls = []
    for i, name in enumerate(head):
        if name.startswith('smsp__pcsamp_warps_issue_stalled_') and not name.endswith('_not_issued'):
            try:
                stalls.append((float(r[i]), name.replace('smsp__pcsamp_warps_issue_stalled_', '')))
            except ValueError:
                pass
        if name in METRICS:
            print(f'  {name} [{units[i]}] = {r[i]}')
    total = sum(x for x, _ in stalls)
    if total:
        top = sorted(stalls, reverse=True)[:12]
        print('  stalls:', ', '.join(f'{n} {x / total * 100:.1f}%' for x, n in top))

rows = ncu_csv('--page', 'source', '--print-source', 'sass')
starts = [i for i, r in enumerate(rows) if 'Address' in r and 'Source' in r]
for s0 in starts[:1]:
    head = rows[s0]
    data = [r for r in rows[s0 + 1:] if len(r) == len(head)]
    isrc, isamp = head.index('Source'), head.index('Warp Stall Sampling (All Samples)')
    reasons = [i for i, n in enumerate(head) if n.startswith('stall_') and '(Not' not in n]
    total = sum(float(r[isamp] or 0) for r in data)
    print('SASS lines', len(data), 'samples', total)
    with open(REP.replace('.ncu-rep', '') + '.lines.tsv', 'w') as f:
        for k, r in enumerate(data):
            samples = float(r[isamp] or 0)
            why = sorted(((float(r[i] or 0), head[i][6:]) for i in reasons), reverse=True)[:2]
            f.write(f"{k}\t{samples / total * 100 if total else 0:.3f}\t"
                    + ' '.join(f'{n}:{x:.0f}' for x, n in why if x) + f"\t{r[isrc].strip()}\n")
    for k, r in enumerate(data):
        samples = float(r[isamp] or 0)
        if total and samples / total >= 0.006:
            why = sorted(((float(r[i] or 0), head[i][6:]) for i in reasons), reverse=True)[:2]
            print(f'{k:5d} {samples / total * 100:5.1f}% {r[isrc].strip()[:70]:70s} '
                  + ' '.join(f'{n}:{x / samples * 100:.0f}' for x, n in why))
