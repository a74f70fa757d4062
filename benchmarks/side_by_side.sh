# Sourced by the stage-2 runners: side_by_side "CMD1" "CMD2" runs two commands at once (one CPU thread
# each on this 2-core machine) and fails if either does.
side_by_side() {
    local a b
    bash -c "$1" & a=$!
    bash -c "$2" & b=$!
    wait "$a" && wait "$b"
}
