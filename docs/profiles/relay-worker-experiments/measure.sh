#!/bin/bash
# usage: measure.sh BIN TAG  -- 10 s bench, perf sched_switch over 3 s of the fwd phase
BIN=$1; TAG=$2
mkdir -p /tmp/relay
(TCPR_BENCH_BALANCE_ONLY=new,haproxy,fwd $BIN bench-balance --seconds 10 > /tmp/relay/$TAG.txt 2>&1; echo done > /tmp/relay/$TAG.done) &
rm -f /tmp/relay/$TAG.done
until pgrep -x wrk >/dev/null; do sleep 0.1; done
while pgrep -x wrk >/dev/null; do sleep 0.1; done
until pgrep -x wrk >/dev/null; do sleep 0.1; done
sleep 2
perf record -a -e sched:sched_switch -e syscalls:sys_enter_connect -o /tmp/relay/$TAG.perf -- sleep 3 >/dev/null 2>&1
until [ -f /tmp/relay/$TAG.done ]; do sleep 0.5; done
cat /tmp/relay/$TAG.txt | sed -n 3,4p
perf script -i /tmp/relay/$TAG.perf -F comm 2>/dev/null | sort | uniq -c | sort -rn | head -14
