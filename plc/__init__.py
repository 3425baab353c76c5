"""LineInspect plc package: the appliance's Modbus side.

* :mod:`plc.registers` - the register map as documented data (published in docs/plc.md);
* :mod:`plc.handshake` - the transport-free handshake state machine;
* :mod:`plc.server` / :mod:`plc.client` - Modbus TCP / RTU server and client links;
* :mod:`plc.service` - :class:`~plc.service.PlcService`, the component the app starts;
* :mod:`plc.sim` - the line simulator that plays the PLC (``lineinspect plc-sim``).

Importing this package does not import pymodbus; the links do, when started.
"""
