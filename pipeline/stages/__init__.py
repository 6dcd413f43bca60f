"""One thin module per DVC stage: main() reads params, calls the library, writes outs."""
