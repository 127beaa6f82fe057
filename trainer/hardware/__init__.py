"""What the machine offers: cores, sockets, NUMA, ISA and native bf16; the threads and precision that follow."""
