#!/usr/bin/env bash
# The solver-accuracy suite of docs/benchmarks.md: Hydra multiruns of
# `lissa-influence-accuracy` (conf/accuracy.yaml) into one folder, then one summary
# (solver_accuracy.csv, error_vs_hvps.png) over all of them.
#
#   benchmarks/solver_accuracy.sh [OUT] [OVERRIDE...]
#   benchmarks/solver_accuracy.sh runs/accuracy_fixed                 # digits, embedding fixed
#   benchmarks/solver_accuracy.sh runs/accuracy_updated mode=updated  # embedding updated
#   QUICK=1 benchmarks/solver_accuracy.sh /tmp/acc                    # a few short jobs (smoke test)
#
# OVERRIDEs go to every job. The explicit reference is built by the first job and
# cached under cache_dir, so later jobs only run their solver.
set -euo pipefail
OUT=${1:-multirun/solver_accuracy}
shift || true
run() {  # run NAME OVERRIDE...: one multirun into $OUT/NAME
  local name=$1
  shift
  lissa-influence-accuracy -m "hydra.sweep.dir=$OUT/$name" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
}
EXTRA=("$@")

if [[ -n "${QUICK:-}" ]]; then
  run exact solver=explicit,identity
  run cg solver=cg solver.tol=1e-2,1e-6
  run lissa solver=lissa solver.depth=20
else
  run exact solver=explicit,identity
  run cg_tol solver=cg solver.tol=1e-2,1e-4,1e-6,1e-8,1e-10 solver.max_iter=2000
  run cg_cap solver=cg solver.tol=0 solver.max_iter=10,30,100
  run cg_variants solver=cg solver.tol=1e-8 solver.max_iter=2000 solver.preconditioner=jacobi gauss_newton=false,true
  run cg_gn solver=cg solver.tol=1e-8 solver.max_iter=2000 gauss_newton=true
  run cg_block solver=cg query=each solver.tol=1e-6 solver.max_iter=2000 solver.block=false,true
  run lissa_scale solver=lissa solver.depth=1000 solver.scale=1,auto,10,50
  run lissa_damping solver=lissa solver.depth=1000 solver.damping=1e-4,1e-3,1e-2
  run lissa_stochastic solver=lissa solver.depth=1000 solver.batch_size=64 solver.repeats=1,4
  run lissa_gn solver=lissa solver.depth=1000 gauss_newton=true
  # fast curvature: preconditioned CG, the Kronecker approximations, the HVP implementations
  run cg_pc solver=cg solver.tol=1e-8 solver.max_iter=2000 solver.preconditioner=nystrom,kfac,ekfac
  run kronecker solver=ekfac,kfac
  run lowrank solver=lowrank solver.rank=16,64,256,1024
  run hvp solver=cg solver.tol=1e-8 solver.max_iter=2000 hvp=functional,retained
fi
python -m lissa_influence.experiments.accuracy "$OUT"
