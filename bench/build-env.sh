# Sourced by the timing benchmarks: the environment a build NAME's suffix asks for, so that one
# binary can be measured with a setting on and off in the same run.
#   -rtoff     TESTGROUND_PUMP_REALTIME=off
#   -schedoff  TESTGROUND_INSTANCE_SCHED=off   (-session, -slice: that value)
#   -idlepoll  TESTGROUND_PUMP_IDLE_POLL=on
# Sets the array `env` (empty for any other name).
build_env() {
  env=()
  case $1 in
    *-rtoff) env=(TESTGROUND_PUMP_REALTIME=off) ;;
    *-schedoff) env=(TESTGROUND_INSTANCE_SCHED=off) ;;
    *-session) env=(TESTGROUND_INSTANCE_SCHED=session) ;;
    *-slice) env=(TESTGROUND_INSTANCE_SCHED=slice) ;;
    *-idlepoll) env=(TESTGROUND_PUMP_IDLE_POLL=on) ;;
  esac
}
