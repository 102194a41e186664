#!/bin/bash
# per.sh TAG: switches per wrk connect, per comm
f=/tmp/relay/$1.perf
perf script -i $f -F comm,event 2>/dev/null | awk '
/sys_enter_connect/ { if ($1=="wrk") c++; next }
{ n[$1]++ }
END { printf "wrk connects %d\n", c; for (k in n) if (n[k] > c/20) printf "%-14s %7d %5.2f\n", k, n[k], n[k]/c }' | sort -k3 -rn
