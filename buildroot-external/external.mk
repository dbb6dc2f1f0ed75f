include $(sort $(wildcard $(BR2_EXTERNAL_POWERMETER_PATH)/package/*/*.mk))
