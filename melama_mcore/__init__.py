from melama_mcore.logs import quiet_libraries

quiet_libraries()
