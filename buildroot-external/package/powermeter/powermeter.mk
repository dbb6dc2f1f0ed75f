################################################################################
#
# powermeter
#
################################################################################

# The release tarball (buildroot-external/scripts/release-tarball) already
# carries the vendored crates (VENDOR/, .cargo/config.toml), so Buildroot's
# cargo download step leaves it as it is and powermeter.hash is the sha256 of
# the published file. The site is a placeholder until the repository is
# published: build from a checkout with POWERMETER_OVERRIDE_SRCDIR (see
# buildroot-external/README.md).
POWERMETER_VERSION = 0.1.0
POWERMETER_SOURCE = powermeter-$(POWERMETER_VERSION)-vendored.tar.gz
POWERMETER_SITE = https://example.invalid/powermeter/releases/download/v$(POWERMETER_VERSION)
# The package's own license, then those of the crates compiled into the
# binaries that MIT and Apache-2.0 do not cover (all in powermeter-mqtt), with
# the crates' license files as cargo vendor places them in the tarball's VENDOR/
# (images/sbom/crate-licenses lists them; ci/check-buildroot checks them). A
# POWERMETER_OVERRIDE_SRCDIR tree gets VENDOR/ when it is built (below), so run
# legal-info after the build there.
POWERMETER_LICENSE = MIT or Apache-2.0, BSD-3-Clause (subtle), ISC (ring, rustls-webpki, untrusted)
POWERMETER_LICENSE_FILES = LICENSE-MIT LICENSE-APACHE
POWERMETER_LICENSE_FILES += VENDOR/ring/LICENSE VENDOR/ring/LICENSE-BoringSSL VENDOR/ring/LICENSE-other-bits
POWERMETER_LICENSE_FILES += VENDOR/rustls-webpki/LICENSE VENDOR/rustls-webpki-0.102.8/LICENSE
POWERMETER_LICENSE_FILES += VENDOR/subtle/LICENSE VENDOR/untrusted/LICENSE.txt

# A local source (POWERMETER_OVERRIDE_SRCDIR, or a checkout without VENDOR/)
# is never vendored by the download step: vendor its Cargo.lock here, into the
# build directory, with the same command and the same cargo home as
# Buildroot's download step, so that the build itself stays --offline
# --locked. The crates are cached in $(BR_CARGO_HOME) (inside DL_DIR).
POWERMETER_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /target --exclude /build --exclude /VENDOR

define POWERMETER_VENDOR_LOCAL_SOURCE
	if [ -n "$(POWERMETER_OVERRIDE_SRCDIR)" ] || [ ! -d $(@D)/VENDOR ]; then \
		mkdir -p $(@D)/.cargo $(BR_CARGO_HOME) && \
		cd $(@D) && \
		$(HOST_MAKE_ENV) CARGO_HOME=$(BR_CARGO_HOME) \
			flock $(BR_CARGO_HOME)/.br-lock \
			cargo vendor --locked --manifest-path Cargo.toml VENDOR \
			> $(@D)/.cargo/config.toml; \
	fi
endef
POWERMETER_PRE_BUILD_HOOKS += POWERMETER_VENDOR_LOCAL_SOURCE

POWERMETER_FEATURES = gpio $(if $(BR2_PACKAGE_POWERMETER_RPPAL),rppal)
POWERMETER_CARGO_BUILD_OPTS = \
	--package powermeterd \
	--features "$(POWERMETER_FEATURES)"

POWERMETER_PROFILE_DIR = $(if $(BR2_ENABLE_DEBUG),debug,release)
POWERMETER_BIN_DIR = $(@D)/target/$(RUSTC_TARGET_NAME)/$(POWERMETER_PROFILE_DIR)
# the counting daemon and the MQTT publisher (a binary of its own: the daemon
# links no MQTT or TLS code)
POWERMETER_BINS = powermeterd powermeter-mqtt

# The binaries carry their dependency list, as the Debian-built images' do
# (cargo auditable there): Buildroot has no cargo-auditable, so
# images/sbom/embed-audit-data writes the same .dep-v0 section from cargo
# metadata (ci/check-supply-chain compares the two byte for byte).
# post-build.sh itemises these crates in the image's SBOM.
POWERMETER_DEPENDENCIES = host-python3

define POWERMETER_EMBED_AUDIT_DATA
	cd $(@D) && \
	$(TARGET_MAKE_ENV) $(PKG_CARGO_ENV) $(POWERMETER_CARGO_ENV) \
		$(HOST_DIR)/bin/python3 images/sbom/embed-audit-data \
			--objcopy "$(TARGET_OBJCOPY)" \
			--features "$(POWERMETER_FEATURES)" \
			--offline --locked \
			--target $(RUSTC_TARGET_NAME) \
			--manifest-path app/Cargo.toml \
			$(addprefix $(POWERMETER_BIN_DIR)/,$(POWERMETER_BINS))
endef
POWERMETER_POST_BUILD_HOOKS += POWERMETER_EMBED_AUDIT_DATA

# The workspace root is a virtual manifest (cargo install cannot use it), so
# install what the build made, and the units every image installs.
define POWERMETER_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(POWERMETER_BIN_DIR)/powermeterd $(TARGET_DIR)/usr/bin/powermeterd
	$(INSTALL) -D -m 0755 $(POWERMETER_BIN_DIR)/powermeter-mqtt $(TARGET_DIR)/usr/bin/powermeter-mqtt
	$(INSTALL) -D -m 0644 $(@D)/$(call qstrip,$(BR2_PACKAGE_POWERMETER_DEFAULT_CONFIG)) \
		$(TARGET_DIR)/usr/share/powermeter/powermeter.toml
	mkdir -p $(TARGET_DIR)/etc/powermeter
	ln -sfn /data/etc/powermeter/powermeter.toml \
		$(TARGET_DIR)/etc/powermeter/powermeter.toml
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/sysusers.d/powermeter.conf \
		$(TARGET_DIR)/usr/lib/sysusers.d/powermeter.conf
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/udev/60-powermeter-gpio.rules \
		$(TARGET_DIR)/usr/lib/udev/rules.d/60-powermeter-gpio.rules
endef

define POWERMETER_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/powermeter.service \
		$(TARGET_DIR)/usr/lib/systemd/system/powermeter.service
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/powermeter.socket \
		$(TARGET_DIR)/usr/lib/systemd/system/powermeter.socket
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/powermeter-http.socket \
		$(TARGET_DIR)/usr/lib/systemd/system/powermeter-http.socket
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/powermeter-reading.socket \
		$(TARGET_DIR)/usr/lib/systemd/system/powermeter-reading.socket
	$(INSTALL) -D -m 0644 $(@D)/app/systemd/powermeter-mqtt.service \
		$(TARGET_DIR)/usr/lib/systemd/system/powermeter-mqtt.service
endef

# The root file system is read-only: the group of the GPIO devices
# (app/systemd/sysusers.d/powermeter.conf) is made at build time.
define POWERMETER_USERS
	- -1 gpio -1 - - - - GPIO devices (powermeter)
endef

$(eval $(cargo-package))
